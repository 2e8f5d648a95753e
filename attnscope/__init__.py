"""attnscope: exact attention statistics for Hugging Face causal LMs, at long context."""
__version__ = "0.1.0"
