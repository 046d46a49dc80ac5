"""The kiln CLI (``kiln export | build | run | inspect``)."""
