"""The seed article's endpoints, with loopwatch installed: ``uvicorn demo_app.main:app``."""
