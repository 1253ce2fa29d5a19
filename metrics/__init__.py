"""The measuring side of stopstorm, one folder per stage of the pipeline a record travels:

record.py and figures.py (the vocabulary: the client's stream record, a figure with its unit and source) →
truth/ (server truth read from where it lives) → analysis/ (pure figures) → report/ (writers) ; plugin/ wires
them to Locust's events. Arrows run down that list; nothing here imports stopstorm.users.
"""
