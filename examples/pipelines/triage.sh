#!/bin/sh
# Reads one log record on standard input and prints only the route line: the
# record itself goes on, unchanged, to the output named.
grep -q 'ERROR'
case $? in
0) echo "dirq-route: alerts" ;;
1) echo "dirq-route: routine" ;;
*) exit 75 ;; # grep failed: try again later
esac
