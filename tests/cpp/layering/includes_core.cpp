// Compiled with core's include root only (Note [Layer include roots]): core's own header is there.
#include "zeal/core/error.h"

int main() { return 0; }
