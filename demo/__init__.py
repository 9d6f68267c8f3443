"""Voice demo: microphone -> faster-whisper -> streamed jaxkd answer, in Gradio on FastAPI.

``python -m demo`` starts it (see ``demo/__main__.py``); ``demo.app.create_app`` builds the app.
"""
