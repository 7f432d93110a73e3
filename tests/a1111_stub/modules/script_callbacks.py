ui_settings_callbacks = []
app_started_callbacks = []


def on_ui_settings(callback):
    ui_settings_callbacks.append(callback)


def on_app_started(callback):
    app_started_callbacks.append(callback)
