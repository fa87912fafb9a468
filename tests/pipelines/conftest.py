WORST: dict[str, int] = {}      # parity comparison -> max pixel difference (out of 255)


def pytest_terminal_summary(terminalreporter):
    if WORST:
        name = max(WORST, key=WORST.get)
        terminalreporter.write_line(f"diffusers parity: worst case {WORST[name]}/255 in {name} "
                                    f"over {len(WORST)} comparisons")
