"""droidpool: an OpenAI-compatible model server over a pool of warm Factory droid CLI workers."""

__version__ = "0.1.0"
