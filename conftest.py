"""Root conftest: enables pytester for the plugin's own tests (it must live at the rootdir)."""

pytest_plugins = ["pytester"]
