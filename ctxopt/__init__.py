"""ctxopt: make long contexts cheap to process and hand the generator a short KV cache."""
__version__ = "0.1.0"
