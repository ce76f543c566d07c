pytest_plugins = ["qemulab.pytest_plugin"]
