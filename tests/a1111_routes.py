"""The API routes the extension registers when the (stub) webui starts, for tests of its HTTP API."""


def registered_routes() -> dict:
    """Run every ``app_started`` callback, as the webui does once its FastAPI app exists, with an app that records
    each route; returns ``{path: endpoint}``. The ``modules`` stub must be importable (the tests' fixtures see to it)."""
    from modules import script_callbacks

    routes = {}

    class App:
        def add_api_route(self, path, endpoint, methods, response_model):
            routes[path] = endpoint

    for callback in script_callbacks.app_started_callbacks:
        callback(None, App())
    return routes
