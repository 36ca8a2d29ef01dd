"""Errors ctxopt raises on bad input. Each message names the problem and what to do instead."""


class CtxoptError(Exception):
    """Base class of every error ctxopt raises on purpose."""


class ModelLoadError(CtxoptError):
    """A model name, folder or file could not be resolved or loaded."""


class CorpusError(CtxoptError):
    """A corpus folder or file is missing, empty or unreadable."""


class IndexLoadError(CtxoptError):
    """An index folder is missing, incomplete or corrupt."""


class InputError(CtxoptError, ValueError):
    """A question, budget or option that cannot be used as given."""


class ContextTooLongError(InputError):
    """The prompt is longer than the model's maximum positions."""


class EngineError(CtxoptError):
    """A serving engine could not be reached, refused a request or failed while answering it."""
