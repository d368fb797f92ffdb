from still.cli import run

run()
