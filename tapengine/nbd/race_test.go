//go:build race

package nbd

// raceEnabled trims the largest transfers under -race, where every byte
// copied costs ten times more and finds no more races.
const raceEnabled = true
