"""The kiln CLI (``kiln export | run | inspect``)."""
