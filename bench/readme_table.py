"""Print the README's results table from committed result files (no hand-typed figures).

    python bench/readme_table.py bench/results/*.json
"""

import json
import sys


def main(paths):
    print("| device | torch / triton | preset | dtype | backend | ms | GB/s | % of copy | x reference |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for path in paths:
        with open(path) as f:
            for r in json.load(f):
                print(f"| {r['device_name']} | {r['torch']} / {r['triton']} | {r['preset']} "
                      f"| {r['dtype']} | {r['backend']} | {r['ms']:.2f} | {r['gbps']:.1f} "
                      f"| {100 * r['gbps'] / r['copy_gbps']:.0f}% "
                      f"| {r['speedup_vs_reference']:.2f}x |")
        print(f"\n(from `{path}`)\n")


if __name__ == "__main__":
    main(sys.argv[1:])
