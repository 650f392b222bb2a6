"""An OpenAI-compatible HTTP server over the inference scheduler (`sleeplm serve`): `create_app` in `app.py`."""
