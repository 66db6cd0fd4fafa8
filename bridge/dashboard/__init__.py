"""The live browser dashboard at ``/``: static page (``static/``), MQTT.js fetched and
verified by :mod:`bridge.dashboard.vendor`, served by :mod:`bridge.dashboard.routes`."""
