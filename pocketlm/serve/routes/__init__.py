"""The server's routes as FastAPI ``APIRouter``s; each reads the app's state (schedulers,
metrics) through ``request.app.state``, which ``create_app`` sets up."""
