package rbd

import "github.com/blktap-go/blktap/internal/rbdspec"

// CreateOptions control Create; see package rbdspec, where they live so
// that the YAML parser checks them without linking librbd.
type CreateOptions = rbdspec.CreateOptions

// FeatureNames are the names CreateOptions.Features takes.
func FeatureNames() []string { return rbdspec.FeatureNames() }

// ParseFeatures reads features=a+b+c.
func ParseFeatures(v string) ([]string, error) { return rbdspec.ParseFeatures(v) }
