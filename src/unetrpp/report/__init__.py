"""Reading finished work back: the comparison table of several runs (``compare``) and the HTML report (``report``)."""
