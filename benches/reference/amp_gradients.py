"""How far PyTorch's autocast moves a first step's gradients: cosine and relative error between
the f32 gradients and those under torch.autocast(bfloat16 / float16) on the CPU, for a narrow
CIFAR ResNet-18 (8-64 channels) with a SimCLR projector (64-64-32, batch norm), NT-Xent at tau 0.5,
64 random images (32 pairs). BENCHMARKS.md's mixed-precision section sets selfsup's
(tests/train.rs, `bf16_and_f16_gradients_point_where_f32s_do`) beside it.

Run: python3 benches/reference/amp_gradients.py
"""
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
class Small(nn.Module):
    def __init__(s):
        super().__init__()
        from torchvision.models.resnet import BasicBlock
        w=[8,16,32,64]; s.conv1=nn.Conv2d(3,8,3,1,1,bias=False); s.bn1=nn.BatchNorm2d(8)
        layers=[]; cin=8
        for i,c in enumerate(w):
            st=1 if i==0 else 2
            ds=None if st==1 and cin==c else nn.Sequential(nn.Conv2d(cin,c,1,st,bias=False),nn.BatchNorm2d(c))
            layers+= [BasicBlock(cin,c,st,ds), BasicBlock(c,c)]; cin=c
        s.layers=nn.Sequential(*layers)
        s.proj=nn.Sequential(nn.Linear(64,64),nn.BatchNorm1d(64),nn.ReLU(),nn.Linear(64,32),nn.BatchNorm1d(32))
    def forward(s,x):
        x=F.relu(s.bn1(s.conv1(x))); x=s.layers(x); return s.proj(x.mean((2,3)))
def loss_fn(z, t=0.5):
    z=F.normalize(z.float(),dim=1); n=z.shape[0]//2
    s=z@z.T/t; s.fill_diagonal_(-1e9)
    target=torch.cat([torch.arange(n,2*n),torch.arange(0,n)])
    return F.cross_entropy(s,target)
x=torch.randn(64,3,32,32)
def grads(dtype):
    torch.manual_seed(0); m=Small()
    with torch.autocast('cpu',dtype=dtype,enabled=dtype is not None):
        z=m(x)
    l=loss_fn(z); l.backward()
    return l.item(), torch.cat([p.grad.flatten() for p in m.parameters()])
l0,g0=grads(None)
for d in [torch.bfloat16, torch.float16]:
    try:
        l,g=grads(d)
        print(d, l0, l, 'cos', F.cosine_similarity(g0,g,0).item(), 'rel', ((g-g0).norm()/g0.norm()).item())
    except Exception as e: print(d, 'failed', e)
