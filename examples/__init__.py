"""Runnable examples of casern; run them from the repository root.

    python -m examples.chatbot        the demo (same as `casern demo`)
    python -m examples.support        the support-inquiry flow of the original casern
    flask --app examples.flask_app run
    uvicorn examples.fastapi_app:api

`examples.conversations` is the small conversation machine both web examples serve.
"""
