#!/bin/sh
# reup bench stand-in for NixOS's switch-to-configuration: records the activation.
# usage: switch-to-configuration switch|boot|test|dry-activate
echo "${1:-switch} @toplevel@" >> "${REUP_ROOT:-}/activations"
