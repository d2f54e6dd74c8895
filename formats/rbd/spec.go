package rbd

import "github.com/blktap-go/blktap/internal/rbdspec"

// Spec names one RBD image; see package rbdspec.
type Spec = rbdspec.Spec

// ErrBadSpec: an image name that ParseSpec refuses.
var ErrBadSpec = rbdspec.ErrBadSpec

// ParseSpec reads an image name: POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE...].
func ParseSpec(s string) (Spec, error) { return rbdspec.Parse(s) }
