"""What the tests and the benchmarks share: the app's servers and a Ray head (servers.py), the
lecture-hall proxy (proxy.py), the browser (browser.py), a simulated student's tab over
Streamlit's websocket (student.py). bench/ holds benchmarks only."""
