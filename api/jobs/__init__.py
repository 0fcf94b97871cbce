"""Jobs: their database (store), files, queue and the submit / cancel / delete service."""
