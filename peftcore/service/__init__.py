"""The run service around the teaching core: runs and their fair line (runs.py), where a run
trains (executors.py: in this process; ray_executor.py: on Ray workers), and the store of saved
phi and classes (store.py, SQLite). It imports the core, never the reverse, and never streamlit:
`import peftcore` loads none of it."""
