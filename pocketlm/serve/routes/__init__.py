"""The server's routes as FastAPI ``APIRouter``s, each reading the app's state (schedulers,
metrics, timeout, router) through ``request.app.state``, which ``create_app`` sets up:
``info`` (health, metrics, models, the chat page), ``chat`` and ``completions``."""
