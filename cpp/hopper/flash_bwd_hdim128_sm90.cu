// fa3_jax Hopper backward instantiations for head dim 128.
#include "flash_bwd_launch_template_sm90.h"

#if FA3_BWD_HDIM128
FA3_BWD_INSTANTIATE(128, 128)
#endif
