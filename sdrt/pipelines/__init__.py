"""NumPy-only pipeline: tokenizer, schedules and samplers, denoisers, tasks, image I/O. Never imports torch."""
