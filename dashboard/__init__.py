"""Streamlit dashboard over the runs a Probe records; start it with ``streamlit run dashboard/app.py``."""
