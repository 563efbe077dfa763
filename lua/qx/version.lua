-- qx's version: the one place it is written. init.lua exposes it as qx._VERSION, `qx --version`
-- prints it, and scripts/rockspec.sh writes it into rockspec/qx-<version>-1.rockspec.
return "0.2.0"
