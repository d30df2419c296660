"""Print one of the README's two opening commands, so CI runs them exactly as the README writes them.

    bash -c "$(python tools/readme_command.py test)"    # install and run the tests
    bash -c "$(python tools/readme_command.py demo)"    # install and run the demo
"""

import argparse
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["demo", "test"], help="the first command (demo) or the second (test)")
    which = parser.parse_args().which
    first_block = re.search(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    print(commands[0 if which == "demo" else 1])
