"""fastroute: a very fast model router for LLM inference."""

from fastroute._core import Decision, Router, __version__
from fastroute.errors import ConfigError, FastrouteError, RequestError

__all__ = ['ConfigError', 'Decision', 'FastrouteError', 'RequestError', 'Router', '__version__']
