"""The PyQt6 + pyqtgraph operator console (arrives with the console issue)."""
