"""The few named exceptions sdrt raises. Each message says what is wrong and how to fix it."""


class SdrtError(Exception):
    """Base class: a user-facing failure with a message that names the input at fault."""


class InvalidRequest(SdrtError, ValueError):
    """A generation request is malformed (size, strength, sampler, images...)."""


class ExportError(SdrtError):
    """A model could not be exported (unknown source, unsupported architecture...)."""


class ParityError(ExportError):
    """An exported graph does not reproduce the torch model within tolerance."""

    def __init__(self, component: str, failures: list[str]):
        self.component = component
        self.failures = failures
        super().__init__(f"{component}: ONNX output differs from torch beyond tolerance:\n  "
                         + "\n  ".join(failures)
                         + "\nre-export with a lower --opset or without --fp16, or report the model")


class ModelFolderError(SdrtError):
    """A folder is not a complete, intact sdrt export."""


class ProfileError(SdrtError):
    """A request falls outside the shapes a compiled engine was built for."""


class BackendUnavailable(SdrtError):
    """A requested runtime/backend is not installed or cannot run here."""
