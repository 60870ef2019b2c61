"""What the commands show and save: terminal tables (``printers``), the tuned-config record and other tools' spellings
of it (``export``), the report directory (``report``) and plots that only draw (``plots``). May import every layer
below, the stages included, to read their results; it runs nothing itself, and only ``cli`` imports it.
"""
