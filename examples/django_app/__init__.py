"""A Django front for conversations stored in casern (one casern app per process).

    POST /conversations/<id>/messages        {"text": "hi"} -> `send` in a sync view
    POST /async/conversations/<id>/messages  {"text": "hi"} -> `await asend` in an async view
    GET  /conversations/<id>                                -> the state, or 404
    /inspector/                                             -> the casern inspector

Run the web app and, beside it, a worker for the timers::

    python examples/django_app/manage.py runserver
    casern --app examples.django_app.machines:casern_app worker
"""
