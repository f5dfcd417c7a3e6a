"""HTTP only: translate, then delegate. ``build_app`` assembles the server."""
