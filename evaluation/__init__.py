"""Evaluation side: features -> statistics -> metrics, image conversion and I/O, step 7's sample plan and files, the
demo report. Imports ldm/ only."""
