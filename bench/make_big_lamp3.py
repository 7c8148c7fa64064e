"""Makes a synthetic LaMP_3-shaped train file of a given size for the conversion
scale check, by writing copies of a synthetic file with their ids made unique.

    python bench/make_big_lamp3.py SRC_DIR OUT_DIR --copies 3
SRC_DIR is `synth --tasks LaMP_3` output; the copies keep the official layout.
"""

import argparse
import json
from pathlib import Path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--copies", type=int, default=3)
    args = parser.parse_args()
    src = Path(args.src) / "LaMP_3" / "train"
    out = Path(args.out) / "LaMP_3" / "train"
    out.mkdir(parents=True, exist_ok=True)
    golds = json.loads((src / "train_outputs.json").read_text())["golds"]
    with open(out / "train_questions.json", "w") as questions:
        questions.write("[")
        first = True
        for copy in range(args.copies):
            # synth writes one question per line: rewrite ids line by line, in bounded memory.
            with open(src / "train_questions.json") as lines:
                for line in lines:
                    line = line.strip().rstrip(",")
                    if not line.startswith("{"):
                        continue
                    questions.write(("\n" if first else ",\n") + line.replace('"id": "3', f'"id": "3{copy}'))
                    first = False
        questions.write("\n]\n")
    (out / "train_outputs.json").write_text(json.dumps({"task": "LaMP_3", "golds": [
        {"id": "3" + str(copy) + g["id"][1:], "output": g["output"]} for copy in range(args.copies) for g in golds]}))


if __name__ == "__main__":
    main()
