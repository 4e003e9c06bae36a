"""The OpenAI-compatible server: ``create_app`` (app.py), request models (schemas.py), the CLI (commands.py)."""
