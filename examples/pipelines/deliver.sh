#!/bin/sh
# Delivers one message (standard input) into mailbox/, under its id. The file is
# written under a hidden name and renamed, so a reader never sees half of it.
# Exit 0: delivered (dirq commits the message); 75: try again later.
mkdir -p mailbox || exit 75
cat > "mailbox/.$DIRQ_ID" || exit 75
mv "mailbox/.$DIRQ_ID" "mailbox/$DIRQ_ID" || exit 75
