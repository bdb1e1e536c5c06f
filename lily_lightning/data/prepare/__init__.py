"""`prepare vtab1k` and `prepare fgvc`: build the trees `data check` and the DataModules read."""
