from aetrack.cli import main

main(prog_name="aetrack")
