// Compiled with core's include root only (Note [Layer include roots]): a header of a layer above
// core is not on its path, so this must fail to compile.
#include "zeal/engine/engine.h"

int main() { return 0; }
