#!/usr/bin/env python3
"""Counts test cases from Bazel's per-target test.xml files.

usage: count_tests.py TESTLOGS_DIR //pkg:target...
Prints skipped test cases with their reasons, then a final line
"N passed, N failed, N skipped". Exit status 1 if anything failed or a target has no results.
"""
import os
import sys
import xml.etree.ElementTree as ET


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    logs = sys.argv[1]
    passed = failed = skipped = 0
    skipped_lines = []
    failed_lines = []
    for label in sys.argv[2:]:
        pkg, _, name = label.lstrip("/").partition(":")
        xml_path = os.path.join(logs, pkg, name, "test.xml")
        if not os.path.exists(xml_path):
            failed += 1
            failed_lines.append(f"{label}: no test results (did not build or did not run)")
            continue
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            failed += 1
            failed_lines.append(f"{label}: unreadable test.xml ({e})")
            continue
        cases = root.iter("testcase")
        n = 0
        for case in cases:
            n += 1
            cname = f"{label} {case.get('classname', '')}.{case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
                failed_lines.append(cname)
            elif case.get("result") == "skipped" or case.find("skipped") is not None:
                skipped += 1
                sk = case.find("skipped")
                reason = (sk.get("message") if sk is not None else "") or ""
                skipped_lines.append(f"{cname}: {reason.strip()}")
            elif case.get("status", "run") == "notrun":
                skipped += 1
                skipped_lines.append(f"{cname}: disabled")
            else:
                passed += 1
        if n == 0:
            # A target that produced no test cases at all: treat its suite status as one case.
            suite_fail = any(int(s.get("failures", "0")) + int(s.get("errors", "0")) > 0
                             for s in root.iter("testsuite"))
            if suite_fail:
                failed += 1
                failed_lines.append(f"{label}: failed")
            else:
                passed += 1
    for line in failed_lines:
        print(f"FAILED:  {line}")
    if skipped_lines:
        print(f"*** {len(skipped_lines)} TEST CASES SKIPPED (they did NOT run): ***")
        for line in skipped_lines:
            print(f"SKIPPED: {line}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
