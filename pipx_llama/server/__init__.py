"""``pipx-llama serve``: an OpenAI- and Ollama-compatible HTTP server over the engine.

``create_app(registry, settings)`` builds the ASGI app (Starlette); ``ModelRegistry`` holds the
models offered (loaded on first use); ``Scheduler`` runs generations on one worker thread.
"""

from pipx_llama.server.app import ServerSettings, create_app
from pipx_llama.server.registry import ModelRegistry, ModelSpec

__all__ = ["ModelRegistry", "ModelSpec", "ServerSettings", "create_app"]
