"""What the test packages share, imported openly (`from tests.support.server import start_servers`):
launching tritonservers and the gateway, and waiting for a condition. conftest.py files only define
fixtures with these."""
