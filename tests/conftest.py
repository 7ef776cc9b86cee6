pytest_plugins = ["connector.testing.fixtures"]
