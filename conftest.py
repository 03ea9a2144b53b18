"""Test-suite wide settings; the product's fixtures come from the plugin."""

pytest_plugins = ["pytester"]
