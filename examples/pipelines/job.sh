#!/bin/sh
# One job per message: its first line names a file in jobs/ to compress into done/.
# Exit 75 while the file is not there yet (retried later, with backoff); exit 2 for
# a bad name, and gzip's own code when it fails (the message goes to errors/).
read -r name || [ -n "$name" ] || exit 2
case $name in '' | */* | .*) exit 2 ;; esac
[ -f "jobs/$name" ] || exit 75
mkdir -p done || exit 75
gzip -c "jobs/$name" > "done/.$name.gz" || exit
mv "done/.$name.gz" "done/$name.gz"
